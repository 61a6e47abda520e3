"""The competition's data: its two Kaggle layouts, labels, Ray Data datasets of decoded and augmented chips, the
demo dataset, Kaggle download and the submission format."""
