"""Scale-VQA data: records and validation, TFDS packaging, the input pipeline."""
