"""Amazon data pipeline. Only the processed-data format is imported here (numpy + pyarrow), so the
GPU machine can `from gbla.data import load_processed` without polars / sentence-transformers."""
from gbla.data.processed import (ProcessedDataset, SplitArrays, default_processed_dir, leave_one_out_split,
                                 load_processed, save_processed)

__all__ = ["ProcessedDataset", "SplitArrays", "default_processed_dir", "leave_one_out_split",
           "load_processed", "save_processed"]
