"""What apps consume: merge into the base weights, pack adapters beside a shared base model,
the onnxruntime-genai config, verify an app directory, and the installation doctor."""
