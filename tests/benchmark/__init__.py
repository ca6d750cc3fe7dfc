"""Tests of deel.influenciae.benchmark."""
