"""The machine, at the bottom of the layers: its CPU int8 class (cpu), what libraries it has (probes), the one
rule deciding a speed question from interleaved timings (timing), third-party extensions built ahead of their
first use (extensions), the process's peak memory (memory) and long library calls that Ctrl-C and SIGTERM
stop (interrupt). Leaves: they import no vitseg implementation."""
