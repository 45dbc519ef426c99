"""Partition simulation (docs/simulation.md; issue 12): scenario files, contact plans and the
earliest-arrival bound, the deterministic engine that drives the real sync protocol and trust core."""
