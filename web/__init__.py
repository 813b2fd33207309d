"""The web control panel (Flask app factory + Flask-SocketIO). Built in a later issue; see DESIGN.md."""
