from exporter.app.cli import main

raise SystemExit(main())
