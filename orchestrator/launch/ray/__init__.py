"""Ray mode: the cluster, the launcher, and the rank actor that runs inside Ray."""
