"""What `export` builds besides the ONNX graphs: the int8 variant and its accuracy figures."""
