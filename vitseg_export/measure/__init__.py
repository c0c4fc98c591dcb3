"""How fast, and what this machine can do: latency profiles (profiling), the format x precision benchmark and
its report and Pareto picture (benchmark, benchmark_report), and `vitseg doctor` (doctor)."""
