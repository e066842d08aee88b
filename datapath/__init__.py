"""What every part of the data path shares: the journal format, storage backends,
Kafka plumbing, topic naming, the protection plan and the service skeleton."""
