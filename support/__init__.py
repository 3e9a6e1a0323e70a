"""What the tests (tests/) and the benchmarks (bench/) share: helpers for the processes
they start. Not part of the gateway's package."""
