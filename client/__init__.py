"""The bank: a Flower ClientApp."""
