"""Object-detection stages: image decode and letterbox, YOLOv5-style detector, NMS."""
