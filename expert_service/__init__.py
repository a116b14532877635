"""Expert worker service: holds the weights of its experts only and computes their rows."""
