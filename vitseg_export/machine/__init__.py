"""The machine, at the bottom of the layers: its CPU int8 class (cpu), what libraries it has (probes), the one
rule deciding a speed question from interleaved timings (timing), third-party extensions built ahead of their
first use (extensions) and the process's peak memory (memory). Leaves: they import no vitseg implementation."""
