"""What the lab is for: the benchmark, the demo, the soak and the live timeline."""
