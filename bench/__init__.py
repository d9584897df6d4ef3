"""Side-by-side benchmarks against peer tools. Run each as a module: python -m bench.<name>."""
