from fusecsi.cli import main

raise SystemExit(main())
