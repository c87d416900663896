"""Images and where they come from: layouts, decoding, groups and splits, scoring sets, sample data."""
