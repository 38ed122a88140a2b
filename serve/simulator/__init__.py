"""The discrete-event simulator of a serving plan, its service-time profiles and predictions, and the map."""
