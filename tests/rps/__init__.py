"""Tests of deel.influenciae.rps."""
