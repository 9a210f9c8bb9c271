"""afm-mlx: AFMTextV7 on MLX."""
