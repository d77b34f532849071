"""The per-run series are written directly (agent/exposition.py), not through prometheus_client: the text must
be exactly what prometheus_client writes for the same samples, whatever the label values and numbers."""

from __future__ import annotations

import math
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gradwatch.agent import catalogue as c
from gradwatch.agent.collector import _RUN_SPECS
from gradwatch.agent.exposition import SeriesWriter, escape_label_value, format_value, render

label_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12) | \
    st.sampled_from(['a"b', "back\\slash", "new\nline", "", "run-00001", 'end\\"'])
values = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1e6, 999999.0, 1234567.0, 2.0**31, 2.0**64, 1e-320, -1e6, 123456789012.5, 5e-324])


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _prometheus_client_text(spec: c.MetricSpec, samples: list[tuple[list[str], float]]) -> str:
    family = spec.family()
    for labels, value in samples:
        family.add_metric(labels, value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([family]))
    return generate_latest(registry).decode()


@settings(max_examples=200, deadline=None)
@given(spec=st.sampled_from(_RUN_SPECS), data=st.data())
def test_every_run_family_is_written_as_prometheus_client_writes_it(spec: c.MetricSpec, data: st.DataObject) -> None:
    samples = data.draw(st.lists(st.tuples(st.lists(label_values, min_size=len(spec.labels),
                                                    max_size=len(spec.labels)), values), max_size=4))
    writer = SeriesWriter(spec)
    ours = render([(spec, [writer.line([escape_label_value(v) for v in labels], value) for labels, value in samples])])
    assert ours == _prometheus_client_text(spec, samples)


@settings(max_examples=100, deadline=None)
@given(labels=st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), label_values, max_size=6))
def test_run_info_with_user_labels_is_written_as_prometheus_client_writes_it(labels: dict[str, str]) -> None:
    family = GaugeMetricFamily(c.RUN_INFO.name, c.RUN_INFO.help)
    family.add_sample(c.RUN_INFO.name, labels, 1.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([family]))
    ours = render([(c.RUN_INFO, [SeriesWriter(c.RUN_INFO).line_with(labels, 1.0)])])
    assert ours == generate_latest(registry).decode()


def test_values_parse_back_to_themselves() -> None:
    for value in (math.nan, math.inf, -math.inf, 0.0, 1e6, 2.0**53, 1e-300, -2.5, 1e300):
        text = render([(c.LOSS, [SeriesWriter(c.LOSS).line(["r", "0", "0"], value)])])
        parsed = next(iter(text_string_to_metric_families(text))).samples[0].value
        assert (math.isnan(parsed) and math.isnan(value)) or parsed == value, (value, format_value(value))
