"""Stored messages: the on-disk logs of topic queues."""
