"""The real test world: Kubernetes control plane, MinIO and Helm, located or built from their Go modules.

Used by the test suite's fixtures and the benchmarks; not part of the operator's runtime.
"""
