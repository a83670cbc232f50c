"""roadsight training: datasets, networks, training engine, MLflow tracking and ONNX export."""
