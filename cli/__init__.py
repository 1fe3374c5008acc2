"""The keybrake command line."""
