"""The per-run series in Prometheus' text format (0.0.4), written directly.

prometheus_client's ``generate_latest`` validates and escapes every label name of every sample and builds
a ``Sample`` per series: at 5,000 runs (140,000 series) that took 2-3 s of the agent's one core, all of it
under the state lock. The run families have fixed label names (checked once, in agent/catalogue.py and its
tests), so here each series costs one string: its labels are escaped once per rank, its value formatted
as Go does (``+Inf``, ``-Inf``, ``NaN``). tests/agent/test_exposition.py parses this output and
prometheus_client's for the same samples and requires the same series and values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from gradwatch.agent.catalogue import MetricSpec


def escape_label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def format_value(value: float) -> str:
    """A sample value as Prometheus (Go) writes it, as prometheus_client's ``floatToGoString`` does: ``+Inf``,
    ``-Inf``, ``NaN``, exponents from 1e+06 up."""
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def label_set(labels: dict[str, str]) -> str:
    """``{name="value",...}`` sorted by name, as prometheus_client writes them; "" without labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in sorted(labels.items())) + "}"


def family_header(spec: MetricSpec) -> str:
    help_text = spec.help.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {spec.name} {help_text}\n# TYPE {spec.name} {spec.kind}\n"


class SeriesWriter:
    """Writes the sample lines of one family: its label names are fixed, so the text around the values is made
    once (a format template); each line costs the formatting of its value. Label values are given escaped
    (``escape_label_value``): a run's name is escaped once for all its series."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        order = sorted(range(len(spec.labels)), key=spec.labels.__getitem__)
        labels = ",".join(f'{spec.labels[i]}="{{{i}}}"' for i in order)
        self._template = f"{spec.name}{{{{{labels}}}}} " if labels else f"{spec.name} "

    def line(self, escaped: Sequence[str], value: float) -> str:
        return self._template.format(*escaped) + format_value(value) + "\n"

    def line_with(self, labels: dict[str, str], value: float) -> str:
        """A line whose label names vary (gradwatch_run_info's user labels); values not yet escaped."""
        return f"{self.spec.name}{label_set(labels)} {format_value(value)}\n"


def render(families: Iterable[tuple[MetricSpec, Iterable[str]]]) -> str:
    """The text of families from their sample lines (SeriesWriter)."""
    out: list[str] = []
    for spec, lines in families:
        out.append(family_header(spec))
        out.extend(lines)
    return "".join(out)
