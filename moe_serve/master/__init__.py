"""The master: holds the gates, fans tokens out to the workers, combines their partial sums."""
