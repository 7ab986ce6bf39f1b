from clipmill.cli import main

raise SystemExit(main())
