"""Scale-VQA TFDS builder (`tfds build tfds_builders/scale_vqa --manual_dir DIR`)."""
