"""LightningDataModules over WebDataset shards, shard writers, converters and generated datasets."""
