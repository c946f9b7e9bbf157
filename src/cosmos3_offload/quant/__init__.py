"""FP8 weights and the linear layers that run them: the math (fp8.py), the module that holds one
quantized weight and picks its activation precision (linear.py), and the checkpoint's step policy
that says which denoising steps quantize activations (policy.py). Generic torch: no diffusers."""
