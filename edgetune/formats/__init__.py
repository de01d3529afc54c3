"""The files between the stages: bundle, run and checkpoint, adapter (PEFT names), app directory,
quantized weights, model specs; errors and atomic I/O. Read, write, verify; numpy and json only.

The bottom layer: it imports no other part of edgetune."""
