"""The run spool: the on-disk contract between probes (writers) and the agent (reader).

Stdlib only: both a training process (with torch) and an agent (without torch) import it.
The format is documented in docs/spool-format.md.
"""

from gradwatch.spool.format import FORMAT_NAME, FORMAT_VERSION, SpoolLayout, default_home
from gradwatch.spool.records import RecordKind

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "RecordKind", "SpoolLayout", "default_home"]
