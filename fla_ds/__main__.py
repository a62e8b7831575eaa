from fla_ds.cli import main

raise SystemExit(main())
