"""Lightning callbacks: training checks and pictures."""
