"""The `seqfoundry` command line and everything that talks to Ray and W&B."""
