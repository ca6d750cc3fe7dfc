"""Model zoo: every method of the library on realistic architectures, against brute-force ground truths."""
