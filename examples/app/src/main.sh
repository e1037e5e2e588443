# The application: greets its first argument (default: world) under a banner.
banner "$APP_NAME $APP_VERSION"
greet "${1:-world}"
