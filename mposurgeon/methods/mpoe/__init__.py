"""`mpoe`: MPO mixtures of experts that share one central core (`mposurgeon moe`, then train)."""
