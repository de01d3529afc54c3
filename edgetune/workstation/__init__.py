"""What runs where torch is: export of a Hugging Face model into a bundle, the gradient rules,
graph rewrites, quantization of the frozen base and weight streaming."""
