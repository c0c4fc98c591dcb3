"""The verdict on an artifact: verify it against PyTorch (verify), find where it first leaves PyTorch when it
fails (locate), and the pytest helper for a user's CI (testing)."""
