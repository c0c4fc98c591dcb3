"""runner outputs -> comparison: the images both sides run (inputs), the mask-level metrics and thresholds'
judgements (metrics), the one run-then-compare loop over every shape an artifact declares (comparator) and
the report a verdict writes (report). Export's self-parity, verify, benchmark and QAT all use this loop."""
