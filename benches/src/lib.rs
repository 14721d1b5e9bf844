//! Benchmarks (see the binaries under src/bin).
