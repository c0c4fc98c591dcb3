"""artifact -> masks for a user's pixels, torch-free: still images and folders (still)."""
