"""The Wan2.2 VAE's two directions as this project runs them: the exact tiled decode (frames
leave the device as they are decoded) and the encode of conditioning frames."""
