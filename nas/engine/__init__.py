"""The training machinery shared by the search and the retraining: one loop, one checkpoint dict."""
