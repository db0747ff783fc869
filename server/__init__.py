"""The federation's server: a Flower ServerApp, its results and its report."""
