"""Integration with OpenRLHF: the launcher, the trainer hooks and the stability monitor."""
