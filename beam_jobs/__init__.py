"""Deployable Beam jobs built on streamrnn.beam."""
