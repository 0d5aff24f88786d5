"""Readers of the source formats the converter accepts, one module per format.

Each module offers the same two functions, used by `openvision_max.data.convert`:

    plan(inputs, options) -> Plan
        Runs in the parent before any work: checks that the inputs can be opened (raising `UsageError`,
        which the CLI turns into one line and exit status 2) and cuts the work into jobs, one per output shard.
        A job's `source` is a JSON-able description of exactly what the shard is made from; it is stored in the
        shard's sidecar so that a re-run can tell a finished shard from a stale one.
    read(source) -> Iterator[Sample | RecordError]
        Runs in a worker: yields the raw samples of one job in a fixed order, or a `RecordError` for a sample
        that the format itself already condemns (a cut-off tar member, a JSON file that does not parse).

All content checks shared by the formats (image decodes, captions present and UTF-8, the recaption fallback)
live in `sources.sample`, so the three formats skip and count bad samples the same way.
"""
